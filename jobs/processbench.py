"""ProcessBench: a PRM's first-error F1 on the four subsets (the published metric).

    ray job submit --working-dir . -- python jobs/processbench.py --config mathprm/configs/processbench_qwen.yaml \
        prm=qwen:/models/Qwen2.5-Math-PRM-7B out=$PWD/runs/eval/processbench_qwen.json
    python jobs/processbench.py prm=runs/gsm8k/prm limit=100        # a balanced, seeded sample per subset

Runs in one process on the node the job lands on (the PRM on its GPU when it has one). Writes
the JSON report (per subset: error / correct accuracy and F1; the average F1; skipped items).
Fields: `mathprm.eval.processbench.ProcessBenchConfig` (`python jobs/processbench.py --help`).
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["processbench", *sys.argv[1:]]))
