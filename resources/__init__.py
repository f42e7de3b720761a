# Makes `resources/` installable as the data package `lemonade.resources` (see setup.cfg package_dir).
