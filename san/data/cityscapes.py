"""Cityscapes-27: Cityscapes' fine labels with the 27 non-void classes (PiCIE, STEGO).

Layout (the official `leftImg8bit_trainvaltest` and `gtFine_trainvaltest` archives):

    <root>/leftImg8bit/{train,val,test}/<city>/<id>_leftImg8bit.png
    <root>/gtFine/{train,val,test}/<city>/<id>_gtFine_labelIds.png

The sample id is `<id>` (`<city>_<seq>_<frame>`). Labels: the 34 `labelIds` (0-33) minus
the 7 void ones (0-6: unlabeled, ego vehicle, rectification border, out of roi, static,
dynamic, ground) give 27 classes, class = labelId - 7, as STEGO's `CityscapesSeg` does
(`target - first_nonvoid`, first_nonvoid = 7). Void ids and anything above 33 are ignored.
An image without a gtFine file (e.g. a split shipped without labels) is unlabelled.
"""

from __future__ import annotations

from san.data.layout import LayoutDataset, lookup_table, stem

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
FIRST_NON_VOID = 7

# Names of labelIds 7..33 (cityscapesScripts' labels.py), in id order.
CLASS_NAMES = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
]  # fmt: skip


class Cityscapes27(LayoutDataset):
    """Cityscapes images with labelIds 7..33 mapped to classes 0..26, the rest ignored."""

    class_names = CLASS_NAMES
    n_classes = len(CLASS_NAMES)
    table = lookup_table({FIRST_NON_VOID + i: i for i in range(len(CLASS_NAMES))})
    LAYOUT = (
        f"<root>/leftImg8bit/<split>/<city>/<id>{IMAGE_SUFFIX} and "
        f"<root>/gtFine/<split>/<city>/<id>{LABEL_SUFFIX}"
    )

    def __init__(self, root: str, split: str) -> None:
        super().__init__(root, split)
        images = self.listing(self.path("leftImg8bit", split), IMAGE_SUFFIX)
        label_dir = self.path("gtFine", split)
        labels = set(self.listing(label_dir, LABEL_SUFFIX)) if self.fs.isdir(label_dir) else set()
        for image_path in images:
            sample_id = stem(image_path, IMAGE_SUFFIX)
            city = image_path.rsplit("/", 2)[-2]
            label_path = self.path("gtFine", split, city, f"{sample_id}{LABEL_SUFFIX}")
            self.ids.append(sample_id)
            self.image_paths.append(image_path)
            self.label_paths.append(label_path if label_path in labels else None)
        self.check_not_empty()
