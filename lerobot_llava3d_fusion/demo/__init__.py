"""The closed-loop demo and its harness: dataset, VLM pretraining, ablation, outcomes.

``python -m lerobot_llava3d_fusion.demo`` runs :mod:`.touch_block_demo`.
"""
