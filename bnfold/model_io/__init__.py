"""Model files in and out: format detection, safe checkpoint loading, recipes, atomic output writes."""
