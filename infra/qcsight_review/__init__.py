"""qcsight review: the web app where operators confirm, reject or relabel defect alerts; engineers watch the fleet."""
