"""Task generators. Each returns a :class:`~headcircuits.tasks.base.TaskData` that every experiment accepts."""

from headcircuits.tasks.base import TaskData, filter_single_tokens, single_token_ids

__all__ = ["TaskData", "filter_single_tokens", "single_token_ids"]
