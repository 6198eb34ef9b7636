"""Administration: `pop3proxy status` and the metrics endpoint, above the layers they read."""
