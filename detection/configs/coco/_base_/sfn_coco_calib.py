# Shared by the COCO configs: the sj-sfn plugin import and the SNN backbone's calibration source
# (COCO train2017 images through the test pipeline, images only). Change the data root with
# `detection/*.py --data-root` (it also rewrites calib.dataset.data_root) or `--cfg-options`.
custom_imports = dict(imports=['sj_sfn.mmdet'], allow_failed_imports=False)

calib = dict(
    dataset=dict(
        type='CocoDataset', data_root='data/coco/', ann_file='annotations/instances_train2017.json',
        data_prefix=dict(img='train2017/'), test_mode=True,
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='Resize', scale=(1333, 800), keep_ratio=True),
            dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
        ]),
    num_images=64, batch_size=2)
