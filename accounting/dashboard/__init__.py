"""The Panel dashboards for administrators, PIs and students (issue 5): ``reports`` holds the
scoped SQL aggregations, ``app`` the views, ``server`` the hub-authenticated server. Unlike the
rest of accounting/, it reads the broker's tables too (live leases, capacity samples)."""
