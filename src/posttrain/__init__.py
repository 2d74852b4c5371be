"""posttrain: controlled sweeps of LLM post-training algorithms on identical infrastructure.

Layers (imports run one way, see docs/design.md): orchestration (run.py, sweep/) -> the loop (train.py)
-> parts (algorithms/, rollout/, rewards/, models/, data/, evaluate/, results.py, stats.py) -> pure losses/.
"""

__version__ = "0.1.0"
