"""Getting weights: hub and BitTorrent downloads, timed and verified; the local hub of SD 1.5-shaped random weights."""
