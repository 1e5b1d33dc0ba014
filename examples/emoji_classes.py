"""Write the ~420 everyday emoji of `emoji-everyday` as a class-per-folder data set, 32x32 PNGs.

    python examples/emoji_classes.py OUT_DIR

Each emoji becomes one class: OUT_DIR/<caption with hyphens for spaces>/0.png. OUT_DIR/class-names.txt
lists the captions themselves ("cat face"), one per line in the order `ddpm train` numbers the classes
(folder names sorted), for `examples/export_fp16.py --class-names`. This is how the built-in `emoji`
model's training data was made (see its MODEL_CARD.md).
"""

import argparse
from pathlib import Path

from PIL import Image

from ddpm_cli.data.captions import everyday_emoji, load_emoji


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    images, captions = load_emoji(32)
    folders = {}
    for i in everyday_emoji(captions):
        folder = captions[i].replace(" ", "-").replace("/", "-")
        folders[folder] = captions[i]
        (args.out_dir / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(args.out_dir / folder / "0.png")
    (args.out_dir / "class-names.txt").write_text("".join(f"{folders[f]}\n" for f in sorted(folders)))
    print(f"{args.out_dir}: {len(folders)} classes")


if __name__ == "__main__":
    main()
