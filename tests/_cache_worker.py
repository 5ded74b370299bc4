"""Worker of tests/test_cache_shards.py: under ``accelerate launch`` with 2 CPU processes,
every process calls teacher_outputs together; each fills its share and the main process
joins them.

    python -m accelerate.commands.launch --config_file recipes/accelerate/cpu-2proc.yaml \
        tests/_cache_worker.py CACHE_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cache_fixtures import KEY, BATCH, Records, Teacher  # noqa: E402

from distill.engine.accel import process_state  # noqa: E402
from distill.engine.teacher_cache import teacher_outputs  # noqa: E402


def main() -> None:
    state = process_state()
    out = teacher_outputs(Teacher(), Records(), lambda b: {"signal": b["x"]}, key=KEY,
                          cache_dir=Path(sys.argv[1]), batch_size=BATCH, progress=False,
                          processes=state)
    print(f"process {state.process_index}/{state.num_processes}: {len(out.logits)} records")


if __name__ == "__main__":
    main()
