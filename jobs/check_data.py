"""Check a dataset's gold answers against its reference solutions, on Ray.

    ray job submit --working-dir . -- python jobs/check_data.py --config mathprm/configs/check_data.yaml \
        out_dir=$PWD/runs/data_check        # absolute: the job runs in a temporary copy of .
    python jobs/check_data.py datasets='[math500, gsm8k]' limit=100     # local Ray, overrides

Writes runs/data_check/<dataset>/{rows/*.parquet, summary.json}; datasets already checked
are reused unless overwrite=true. Fields: see `mathprm.data.check.DataCheckConfig`.
"""

import sys

from mathprm.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-data", *sys.argv[1:]]))
