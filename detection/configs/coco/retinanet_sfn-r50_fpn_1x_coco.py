# RetinaNet with an SFN-convertible timm ResNet-50 backbone on COCO 2017; local data and weights.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/datasets/coco_detection.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/sfn_coco_calib.py',
]

model = dict(
    backbone=dict(
        _delete_=True, type='SFNResNet', depth=50, out_indices=(1, 2, 3, 4), frozen_stages=1, norm_eval=True,
        pretrained='checkpoints/resnet50.pth', snn=dict(lam=0.25, max_spikes=32, p=0.99, calib={{_base_.calib}})),
    neck=dict(in_channels=[256, 512, 1024, 2048]),
)
