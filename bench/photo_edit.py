#!/usr/bin/env python3
"""Editing photos of another size than the model's, on the demo models: parse → paint hair → crop → edit → paste.

    python bench/photo_edit.py [--faces 10] [--steps 50] [--inside noise] [--out DIR] [--json FILE]

Each photo is a held-out synthetic face rendered at 320 px and cut to 200×260 with the face off-centre (the demo
parser's test split). A fringe — the top rows of the skin — is painted as hair, and the photo is edited by
inversion (the photo's own caption as source and target) through `collab_core.editing.edit_photo` with the bundled demo parser finding the photo's mask. Printed
per face and in total: pixels changed outside the edited region at full resolution (must be 0), the share of
painted pixels whose colour moved nearer the photo's hair colour than its skin colour (agreement, against the
unedited photo's baseline), the share of newly painted pixels (not hair in the photo's true mask) the
demo parser labels 'hair', before and after, and seconds per edit. --out writes, per face, photo | parsed mask | painted mask | result side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collab_core.editing.metrics import colour_agreement  # noqa: E402
from collab_core.editing.photo import edit_photo  # noqa: E402
from collab_core.face_parsing import FaceParser, demo_parser_dir  # noqa: E402
from collab_core.masks import CLASS_NAMES, colorize_labels  # noqa: E402
from collab_core.models import demo_bundle_dir, load_pipeline  # noqa: E402
from collab_core.training.parser import heldout_picture  # noqa: E402
from collab_core.training.synthetic import face_sample  # noqa: E402

HAIR, SKIN = CLASS_NAMES.index("hair"), CLASS_NAMES.index("skin")


def fringe(labels: np.ndarray, rows: int = 14) -> np.ndarray:
    ys, xs = np.nonzero(labels == SKIN)
    strokes = np.zeros(labels.shape, bool)
    strokes[ys.min():ys.min() + rows, xs.min():xs.max()] = True
    return strokes


def strip(*pictures: np.ndarray, gap: int = 6) -> np.ndarray:
    h = max(p.shape[0] for p in pictures)
    cols = []
    for p in pictures:
        pad = np.full((h, p.shape[1] + gap, 3), 255, np.uint8)
        pad[:p.shape[0], :p.shape[1]] = p
        cols.append(pad)
    return np.concatenate(cols, axis=1)[:, :-gap]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--faces", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--inside", choices=["inverted", "noise"], default="noise")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from PIL import Image

    pipe = load_pipeline(demo_bundle_dir())
    parser = FaceParser.from_folder(demo_parser_dir())
    rows = []
    for i in range(args.faces):
        img, truth = heldout_picture(i, seed=0, width=200, height=260)
        strokes = fringe(truth)
        started = time.perf_counter()
        caption = face_sample(i, seed=0, split="test", size=320).caption  # what the mask cannot show (colours)
        r = edit_photo(pipe, img, paint=[("hair", strokes)], parser=parser, text=caption, source_text=caption,
                       steps=args.steps, inside=args.inside, seed=i)
        seconds = time.perf_counter() - started
        changed = r.plan.changed
        agree = colour_agreement(img, r.image, r.plan.source_labels, r.plan.target_labels, changed)
        new_hair = strokes & (truth != HAIR)  # painted pixels that were not hair in the photo's true mask
        hair_before = float((parser.parse(img)[new_hair] == HAIR).mean())
        hair_after = float((parser.parse(r.image)[new_hair] == HAIR).mean())
        row = {"face": i, "crop_box": list(r.plan.box), "changed_outside": r.changed_outside(),
               "painted_pixels": int(strokes.sum()), "new_hair_pixels": int(new_hair.sum()), "agreement": agree["agreement"], "baseline": agree["baseline"],
               "parser_hair_before": hair_before, "parser_hair_after": hair_after, "seconds": round(seconds, 2)}
        rows.append(row)
        print(json.dumps(row))
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(strip(img, colorize_labels(r.plan.source_labels), colorize_labels(r.plan.target_labels),
                                  r.image)).save(args.out / f"face{i:02d}.png")
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("agreement", "baseline", "parser_hair_before",
                                                                  "parser_hair_after", "seconds")}
    total = {"faces": len(rows), "steps": args.steps, "inside": args.inside,
             "changed_outside_total": int(sum(r["changed_outside"] for r in rows)), **mean}
    print("total:", json.dumps(total))
    if args.json:
        args.json.write_text(json.dumps({"total": total, "faces": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
