"""Built-in filter plugins for pop3proxy.

Each message passes through the configured filters once, before it is cached and before any client
sees it. The pipeline and the plugin interface live in ``pop3proxy.filtering``; the built-in filters
(spam tagging, attachment stripping, ...) live in this package.
"""
