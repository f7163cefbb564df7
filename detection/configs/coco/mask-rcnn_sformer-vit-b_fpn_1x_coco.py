# Mask R-CNN with an SFormerViT-B/16 backbone (ViTDet-style simple pyramid) on COCO 2017.
# Set data_root to your local COCO copy and `pretrained` to a local ViT-B/16 checkpoint
# (MAE / DeiT / timm layout); nothing is downloaded.
_base_ = [
    'mmdet::_base_/models/mask-rcnn_r50_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    'mmdet::_base_/schedules/schedule_1x.py',
    'mmdet::_base_/default_runtime.py',
    './_base_/sfn_coco_calib.py',
]

pretrained = 'checkpoints/vit_base_patch16_224.pth'
model = dict(
    backbone=dict(
        _delete_=True,
        type='SFormerViT',
        model_name='vit_base_patch16_224',
        img_size=1024,
        out_strides=(4, 8, 16, 32),
        drop_path_rate=0.1,
        pretrained=pretrained,
        # softmax_max_spikes: more SoftMax levels for flat attention over many tokens (README)
        snn=dict(lam=0.25, max_spikes=32, p=0.99, calib={{_base_.calib}}, convert_kwargs=dict(softmax_max_spikes=128)),
    ),
    neck=dict(in_channels=[192, 384, 768, 768], out_channels=256, num_outs=5),
)
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.1),
    clip_grad=dict(max_norm=1.0, norm_type=2),
)
