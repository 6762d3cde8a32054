"""vivoflow's runtime: intake (HTTP), queue actors, recipe engine, run store and CLI.

Data travels config → intake → actors → engine (events, recipes, templating) → store.
"""
