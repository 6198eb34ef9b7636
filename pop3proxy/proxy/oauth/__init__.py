"""OAuth2 towards the provider: token storage, renewal (`TokenManager`) and the login flows."""

from pop3proxy.proxy.oauth.manager import NeedsAuthorisation, TokenManager, TokenUnavailable
from pop3proxy.proxy.oauth.tokens import check_local_password, has_local_password, set_local_password

__all__ = [
    "NeedsAuthorisation", "TokenManager", "TokenUnavailable",
    "check_local_password", "has_local_password", "set_local_password",
]
