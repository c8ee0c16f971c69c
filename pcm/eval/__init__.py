"""Evaluation: metrics, step tables and reports; toy_gmm scores students of the analytic teacher."""
