"""Facts shared by the converter (tools/) and the readers (pipelines/): normalisation and the
on-disk layout of a converted dataset.

Layout of a converted dataset directory OUT (written by `supmae convert`):

    OUT/classes.json                     list of class names; index = position (ImageFolder order)
    OUT/manifest.json                    tool version, options, counts, files, permutation
    OUT/skipped.tsv                      every input not converted, with the reason
    OUT/ffcv/<split>.beton               fields: "image" (RGBImageField, JPEG), "label" (IntField)
    OUT/wds/<split>/<split>-NNNNNN.tar   webdataset shards: <key>.jpg, <key>.cls (ASCII int),
                                         <key>.label (little-endian int64, fixed width for DALI)
    OUT/wds/<split>/<split>-NNNNNN.idx   DALI index file of each shard
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The paper's RandomResizedCrop (MAE / SupMAE pretraining).
RRC_SCALE = (0.2, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# Validation: resize the shorter side to img_size / CROP_PCT, centre-crop img_size.
CROP_PCT = 0.875

CLASSES_FILE = "classes.json"
MANIFEST_FILE = "manifest.json"
SKIPPED_FILE = "skipped.tsv"
FFCV_DIR = "ffcv"
WDS_DIR = "wds"
FFCV_FIELDS = ("image", "label")
# The converter's third .beton field: the CRC-32 (zlib) of each stored JPEG, checked when a record is
# read, so bytes damaged after conversion are never trained on. A .beton without it (written before
# it existed) still reads: only the decoder's own checks (libjpeg warnings and errors) apply there.
FFCV_CHECKSUM_FIELD = "crc32"
WDS_IMAGE_EXT = "jpg"
WDS_CLS_EXT = "cls"
WDS_LABEL_EXT = "label"
SPLITS = ("train", "val")


def beton_path(root: str, split: str) -> str:
    import os

    return os.path.join(root, FFCV_DIR, f"{split}.beton")


def wds_dir(root: str, split: str) -> str:
    import os

    return os.path.join(root, WDS_DIR, split)
