# RetinaNet with an SFormerViT-B/16 backbone on COCO 2017 (boxes only); local data and weights.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sj_sfn.mmdet'], allow_failed_imports=False)

data_root = 'data/coco/'
pretrained = 'checkpoints/vit_base_patch16_224.pth'
calib = dict(
    dataset=dict(
        type='CocoDataset', data_root=data_root, ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), test_mode=True,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(1333, 800), keep_ratio=True),
            dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
        ]),
    num_images=64, batch_size=2)

model = dict(
    backbone=dict(
        _delete_=True, type='SFormerViT', model_name='vit_base_patch16_224', img_size=1024, out_strides=(4, 8, 16, 32),
        drop_path_rate=0.1, pretrained=pretrained,
        # softmax_max_spikes: more SoftMax levels for flat attention over many tokens (README)
        snn=dict(lam=0.25, max_spikes=32, p=0.99, calib=calib, convert_kwargs=dict(softmax_max_spikes=128))),
    neck=dict(in_channels=[192, 384, 768, 768], start_level=1, add_extra_convs='on_input', num_outs=5),
)
optim_wrapper = dict(
    _delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-4, weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2))
