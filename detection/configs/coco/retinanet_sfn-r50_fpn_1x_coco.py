# RetinaNet with an SFN-convertible timm ResNet-50 backbone on COCO 2017; local data and weights.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sj_sfn.mmdet'], allow_failed_imports=False)

data_root = 'data/coco/'
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
        _delete_=True, type='SFNResNet', depth=50, out_indices=(1, 2, 3, 4), norm_eval=True,
        pretrained='checkpoints/resnet50.pth', snn=dict(lam=0.25, max_spikes=32, p=0.99, calib=calib)),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
)
