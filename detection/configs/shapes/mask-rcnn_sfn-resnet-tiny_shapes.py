# Mask R-CNN with a tiny timm ResNet (SFNTimmBackbone) on the generated shapes data set.
_base_ = './mask-rcnn_sformer-vit-tiny_shapes.py'

model = dict(
    backbone=dict(
        _delete_=True,
        type='SFNTimmBackbone',
        model_name='resnet10t',
        out_indices=(1, 2, 3, 4),
        timm_kwargs=dict(channels=(16, 32, 64, 128), stem_width=16),
        snn=dict(lam=0.25, max_spikes=32, p=0.99, calib={{_base_.calib}}),
    ),
    # a CNN trains well with the plain FPN and the 2-FC box head (the ViT base config uses GN heads)
    neck=dict(in_channels=[16, 32, 64, 128], norm_cfg=None),
    roi_head=dict(bbox_head=dict(type='Shared2FCBBoxHead', norm_cfg=None)),
)
optim_wrapper = dict(optimizer=dict(lr=1e-3))
