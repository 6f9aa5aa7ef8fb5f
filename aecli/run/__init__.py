"""A run directory's whole life: `setup` starts a run in one of its three modes (a preset,
--init weights, --resume RUN) and locks its folder, `training` runs the engine's loop on it,
`files` are its files and lock, `status` says where a run stands (`aecli runs`), and `report`
writes its report.html.

The engine writes through the files it is given and imports nothing from here. Nothing is
imported here either: `aecli.run.setup` reads the preset before torch loads.
"""
