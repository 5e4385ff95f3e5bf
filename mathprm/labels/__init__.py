"""Step labels by tree search: the pure tree search over one problem (`treesearch`: Math-Shepherd
rollouts and OmegaPRM's binary search for the first wrong step), the Parquet step-score table it
writes (`steptable`), and the labelling stage that runs it on Ray actors (`stage`: `mathprm mcts`,
`jobs/mcts.py`). Not to be confused with `mathprm.search`, the PRM-guided search at inference.
"""
