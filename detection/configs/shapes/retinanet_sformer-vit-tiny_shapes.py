# RetinaNet (boxes only) with a tiny SFormerViT backbone on the generated shapes data set.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['sj_sfn.mmdet'], allow_failed_imports=False)

data_root = 'data/shapes/'
metainfo = dict(classes=('rectangle', 'ellipse', 'triangle'), palette=[(220, 20, 60), (0, 128, 255), (0, 200, 0)])
img_scale = (96, 96)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
calib = dict(
    dataset=dict(
        type='CocoDataset', data_root=data_root, metainfo=metainfo, ann_file='annotations/train.json',
        data_prefix=dict(img='train/'), test_mode=True, pipeline=[t for t in test_pipeline if t['type'] != 'LoadAnnotations']),
    num_images=16, batch_size=4)

model = dict(
    backbone=dict(
        _delete_=True, type='SFormerViT', model_name='vit_tiny_patch16_224', img_size=96, patch_size=8, embed_dim=64,
        depth=3, num_heads=2, mlp_ratio=2.0, out_strides=(4, 8, 16, 32),
        snn=dict(lam=0.25, max_spikes=32, p=0.99, calib=calib, convert_kwargs=dict(softmax_max_spikes=128))),
    neck=dict(in_channels=[32, 64, 64, 64], out_channels=64, start_level=1, add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(num_classes=3, in_channels=64, feat_channels=64, stacked_convs=2),
    test_cfg=dict(max_per_img=20),
)
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/train.json', data_prefix=dict(img='train/'),
                 pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    dataset=dict(data_root=data_root, metainfo=metainfo, ann_file='annotations/val.json', data_prefix=dict(img='val/'),
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/val.json', metric='bbox')
test_evaluator = val_evaluator
optim_wrapper = dict(_delete_=True, type='OptimWrapper', optimizer=dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                     clip_grad=dict(max_norm=10.0, norm_type=2))
