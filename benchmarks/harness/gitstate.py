"""The git state of the checkout (commit, dirty tree): one implementation, shared with the demo's
provenance in :mod:`lalora_curv.experiments.gitstate`."""

from lalora_curv.experiments.gitstate import RESULTS_PREFIX, git_state

__all__ = ["RESULTS_PREFIX", "git_state"]
