"""Run the trust protocol from a JSON config file, printing each progress step on a line
(flushed), so that a test can kill the process at a chosen moment."""

from __future__ import annotations

import json
import sys

import torch


def main() -> None:
    torch.set_num_threads(1)
    from trustmap.trust import run

    with open(sys.argv[1]) as handle:
        cfg = json.load(handle)

    def progress(text: str, done: int, total: int) -> None:
        print(f"PROGRESS\t{text}\t{done}\t{total}", flush=True)

    run(cfg, progress=progress)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
