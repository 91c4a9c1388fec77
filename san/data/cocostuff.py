"""COCO-Stuff-27: the curated COCO-Stuff split with 27 coarse classes (PiCIE, STEGO).

Layout (as PiCIE and STEGO read it; `annotations/` holds the `stuffthingmaps_trainval2017`
PNGs, one uint8 fine id 0-181 per pixel, 255 = unlabelled):

    <root>/images/{train2017,val2017}/<id>.jpg
    <root>/annotations/{train2017,val2017}/<id>.png
    <root>/curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt   one id per line

Split names: `train` -> train2017, `val` -> val2017 (the folder names work too). The image
list is PiCIE's curated `Coco164kFull_Stuff_Coarse_7.txt` for both splits (49,629 train and
2,175 val images in the real data); STEGO trains on the larger `Coco164kFull_Stuff_Coarse.txt`
list, which `image_list=` selects.
"""

from __future__ import annotations

from san.data.layout import LayoutDataset, lookup_table

IMAGE_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
SPLIT_DIRS = {"train": "train2017", "val": "val2017"}

# The 27 coarse classes: COCO-Stuff's 12 thing and 15 stuff supercategories, in STEGO's
# order (utils.get_class_labels("cocostuff27")). STEGO names 14 and 15 "food" and
# "furniture" like the thing classes 2 and 3; they get a "-stuff" suffix here so that
# every name is unique.
CLASS_NAMES = [
    # things 0-11
    "electronic", "appliance", "food", "furniture", "indoor", "kitchen",
    "accessory", "animal", "outdoor", "person", "sports", "vehicle",
    # stuff 12-26
    "ceiling", "floor", "food-stuff", "furniture-stuff", "rawmaterial", "textile", "wall",
    "window", "building", "ground", "plant", "sky", "solid", "structural", "water",
]  # fmt: skip

# Fine stuffthingmaps id (0-181) -> coarse class (0-26), exactly STEGO's `Coco.fine_to_coarse`
# (src/data.py), which reproduces PiCIE's fine_to_coarse_dict.pickle: the COCO-Stuff
# supercategory of each of the 91 thing and 91 stuff ids (the 11 thing ids unused in 2017
# keep their supercategory; they never occur). 255 (unlabelled) is ignored.
FINE_TO_COARSE: dict[int, int] = {
    0: 9, 1: 11, 2: 11, 3: 11, 4: 11, 5: 11, 6: 11, 7: 11, 8: 11, 9: 8, 10: 8, 11: 8, 12: 8,
    13: 8, 14: 8, 15: 7, 16: 7, 17: 7, 18: 7, 19: 7, 20: 7, 21: 7, 22: 7, 23: 7, 24: 7,
    25: 6, 26: 6, 27: 6, 28: 6, 29: 6, 30: 6, 31: 6, 32: 6, 33: 10, 34: 10, 35: 10, 36: 10,
    37: 10, 38: 10, 39: 10, 40: 10, 41: 10, 42: 10, 43: 5, 44: 5, 45: 5, 46: 5, 47: 5, 48: 5,
    49: 5, 50: 5, 51: 2, 52: 2, 53: 2, 54: 2, 55: 2, 56: 2, 57: 2, 58: 2, 59: 2, 60: 2,
    61: 3, 62: 3, 63: 3, 64: 3, 65: 3, 66: 3, 67: 3, 68: 3, 69: 3, 70: 3, 71: 0, 72: 0,
    73: 0, 74: 0, 75: 0, 76: 0, 77: 1, 78: 1, 79: 1, 80: 1, 81: 1, 82: 1, 83: 4, 84: 4,
    85: 4, 86: 4, 87: 4, 88: 4, 89: 4, 90: 4, 91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 96: 22,
    97: 15, 98: 25, 99: 16, 100: 13, 101: 12, 102: 12, 103: 17, 104: 17, 105: 23, 106: 15,
    107: 15, 108: 17, 109: 15, 110: 21, 111: 15, 112: 25, 113: 13, 114: 13, 115: 13, 116: 13,
    117: 13, 118: 22, 119: 26, 120: 14, 121: 14, 122: 15, 123: 22, 124: 21, 125: 21, 126: 24,
    127: 20, 128: 22, 129: 15, 130: 17, 131: 16, 132: 15, 133: 22, 134: 24, 135: 21, 136: 17,
    137: 25, 138: 16, 139: 21, 140: 17, 141: 22, 142: 16, 143: 21, 144: 21, 145: 25, 146: 21,
    147: 26, 148: 21, 149: 24, 150: 20, 151: 17, 152: 14, 153: 21, 154: 26, 155: 15, 156: 23,
    157: 20, 158: 21, 159: 24, 160: 15, 161: 24, 162: 22, 163: 25, 164: 15, 165: 20, 166: 17,
    167: 17, 168: 22, 169: 14, 170: 18, 171: 18, 172: 18, 173: 18, 174: 18, 175: 18, 176: 18,
    177: 26, 178: 26, 179: 19, 180: 19, 181: 24,
}  # fmt: skip


class CocoStuff27(LayoutDataset):
    """COCO-Stuff images with their fine labels mapped to the 27 coarse classes."""

    class_names = CLASS_NAMES
    n_classes = len(CLASS_NAMES)
    table = lookup_table(FINE_TO_COARSE)
    LAYOUT = (
        "<root>/images/<split>2017/<id>.jpg, <root>/annotations/<split>2017/<id>.png and "
        f"<root>/curated/<split>2017/{IMAGE_LIST}"
    )

    def __init__(self, root: str, split: str, image_list: str = IMAGE_LIST) -> None:
        super().__init__(root, split)
        folder = SPLIT_DIRS.get(split, split)
        self.image_list = image_list
        listed = self.read_text(self.path("curated", folder, image_list))
        for line in listed.splitlines():
            sample_id = line.strip()
            if sample_id.endswith(".jpg"):
                sample_id = sample_id[: -len(".jpg")]
            if not sample_id:
                continue
            self.ids.append(sample_id)
            self.image_paths.append(self.path("images", folder, f"{sample_id}.jpg"))
            self.label_paths.append(self.path("annotations", folder, f"{sample_id}.png"))
        self.check_not_empty()
