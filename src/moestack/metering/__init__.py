"""Metering: the pricing catalog (``pricing``), the cost model and cost accrual (``cost``), the
gateway's Prometheus metrics (``metrics``), engine cost calibration (``calibrate``), cost reports
over the usage ledger (``report``) and Grafana provisioning (``grafana``)."""
