"""TOML policy: which images may be mounted, by whom, and how.

`load_policy(dir)` reads and validates every ``*.toml`` of a directory;
`Policy.decide(request)` returns a `Decision` (and logs it). See
policy/README.md at the top of the repository for the file format.
"""

from ext4box.policy.digest import sha256_of_fd
from ext4box.policy.engine import Policy
from ext4box.policy.errors import PolicyError, PolicyLoadError
from ext4box.policy.identity import Identity, identity_of_uid, identity_of_user
from ext4box.policy.loader import DEFAULT_POLICY_DIR, load_policy
from ext4box.policy.model import Decision, Request, Rule, RuleVerdict

__all__ = [
    "DEFAULT_POLICY_DIR",
    "Decision",
    "Identity",
    "Policy",
    "PolicyError",
    "PolicyLoadError",
    "Request",
    "Rule",
    "RuleVerdict",
    "identity_of_uid",
    "identity_of_user",
    "load_policy",
    "sha256_of_fd",
]
