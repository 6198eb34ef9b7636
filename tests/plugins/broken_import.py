"""A filter module that cannot be imported: it needs a module that does not exist."""

import pop3proxy_no_such_dependency  # noqa: F401


class Broken:
    name = "broken"
