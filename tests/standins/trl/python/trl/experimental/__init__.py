"""Stand-in for `trl.experimental`."""
