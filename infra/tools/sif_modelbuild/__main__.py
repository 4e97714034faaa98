"""`make models`: build every shipped model into the models cache (skips what is up to date)."""

from __future__ import annotations

import argparse
import logging
import os
import time
import warnings
from pathlib import Path

from sif_modelbuild import efficientnet, minilm, minilm_topic, nsfw, tabular

log = logging.getLogger("sif_modelbuild")
# In build order: minilm-topic reuses the all-minilm-l6-v2 encoder that the minilm builder exports.
BUILDERS = {
    minilm.NAME: minilm.build,
    nsfw.NAME: nsfw.build,
    efficientnet.NAME: efficientnet.build,
    minilm_topic.NAME: minilm_topic.build,
    tabular.NAME: tabular.build,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sif_modelbuild", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("SIF_MODELS_DIR", ".cache/models")))
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--only", choices=sorted(BUILDERS), action="append")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("sif_modelbuild").setLevel(logging.INFO)  # onnxruntime's quantizer is chatty at INFO
    # torch.onnx's notes on how it exported an op are for whoever writes the export; each build checks
    # its exported model against the reference numerically, so they are not the business of `make models`.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx\.")
    names = [n for n in BUILDERS if n in args.only] if args.only else list(BUILDERS)
    for i, name in enumerate(names, 1):
        log.info("[%d/%d] %s", i, len(names), name)
        start = time.perf_counter()
        out = BUILDERS[name](args.out.resolve(), force=args.force)
        log.info("%s ready in %s (%.1fs)", name, out, time.perf_counter() - start)


if __name__ == "__main__":
    main()
