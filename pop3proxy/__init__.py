"""pop3proxy: a caching, filtering POP3 proxy."""

__version__ = "0.1.0"
