"""The HTTP side: admin REST API, subscriber portal and block page, Prometheus metrics."""
