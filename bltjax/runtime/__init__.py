"""What every program of bltjax stands on: how commands run and fail (`cli`, `errors`, `logs`),
process set-up before JAX starts (`process_setup`), multi-host start (`distributed`), the mesh and
the one logical-axis rules table (`sharding`), and local or gs:// paths (`storage`).

Nothing here imports from the rest of bltjax.
"""
