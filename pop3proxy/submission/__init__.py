"""The optional SMTP submission relay: pass-through AUTH, a store-and-forward queue, bounces."""
