"""One vLLM engine (CPU build, in-process core) of the shared-G3 test, driven over stdin/stdout.

Run as a script by test_e2e_shared_g3.py: ``shared_engine.py MODEL DISK_DIR``. Reads one JSON
command per line (``gen`` with a prompt, ``drain``, ``reset_g1``, ``quit``) and answers each with
one line ``KVT <json>``: greedy output tokens and this engine's G3 hit count so far.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vllm_engine_helpers import connectors, drain, engine, generate, reset_g1


def main() -> None:
    model, disk_dir = Path(sys.argv[1]), sys.argv[2]
    extra = {
        "cpu_cache_blocks": 2,
        "disk_cache_blocks": 64,
        "disk_dir": disk_dir,
        "disk_filter": False,
    }
    with engine(model, extra, in_process=True) as llm:
        sched = connectors(llm)[0].scheduler
        print("KVT " + json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            out: dict[str, object] = {}
            if cmd["op"] == "gen":
                ((tokens, _),) = generate(llm, [cmd["prompt"]], max_tokens=8)
                out["tokens"] = tokens
            elif cmd["op"] == "drain":
                drain(llm)
            elif cmd["op"] == "reset_g1":
                reset_g1(llm)
            elif cmd["op"] == "quit":
                break
            out["disk_hit_blocks"] = sched.counters.disk_hit_blocks
            print("KVT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
