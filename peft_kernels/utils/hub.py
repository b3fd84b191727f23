"""``PeftModel.push_to_hub``: uploads the adapter (what ``save_pretrained`` writes), never the base model.

One commit holding adapter_config.json, the adapter weights (one folder per non-default adapter) and the model
card README.md, on ``repo_id`` (created if missing) through ``huggingface_hub.HfApi``. ``tags`` are added to
the card's metadata.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Union


def push_adapter_to_hub(
    model,
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Union[bool, str, None] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[list[str]] = None,
    **save_kwargs,
):
    """Saves ``model``'s adapters to a temporary folder and commits it; returns the commit info."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, **save_kwargs)
        if tags:
            _add_card_tags(os.path.join(folder, "README.md"), tags)
        operations = [
            CommitOperationAdd(
                path_or_fileobj=os.path.join(root, name),
                path_in_repo=os.path.relpath(os.path.join(root, name), folder),
            )
            for root, _, names in os.walk(folder)
            for name in sorted(names)
        ]
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            token=token,
            create_pr=create_pr,
            revision=revision,
        )


def _add_card_tags(readme: str, tags: list[str]) -> None:
    from huggingface_hub import ModelCard

    with open(readme, encoding="utf-8") as file:
        card = ModelCard(file.read())
    card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *tags]))
    card.save(readme)
