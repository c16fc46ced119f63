"""What the operator sees and controls: management API, model manager, metrics, activity, dashboard,
reload, logs, systemd.
"""
