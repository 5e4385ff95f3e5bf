"""Problems and their truth: dataset loaders (GSM8K, MATH, ProcessBench, any table), the
arithmetic world, answer extraction and grading, the data check, and problems as Ray Datasets.

- `problems`: `load_problems(spec)` for every dataset name, `Problem` / `ProcessBenchItem`;
- `arith`: the built-in arithmetic world with exact step truth;
- `answers`, `grading`: the final answer of a solution and whether it equals the gold one;
- `check`: `mathprm check-data`; `ray_data`: the loaders as Ray Datasets.
"""
