"""Similarity engine (fused contrastive / distillation losses at O(N+M) memory).

Not built yet: the objectives in ``distill.objectives`` compute their logits directly until the
engine lands (see the project's issue tracker).
"""
