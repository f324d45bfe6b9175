"""The Panel dashboards for administrators, PIs and students: ``reports`` holds the scoped SQL
aggregations, ``app`` the views, ``server`` the hub-authenticated server. A package of its own
(not part of accounting/): it reads the books (accounting) and the broker's tables (live leases,
capacity samples), and opens the broker's database as a reader that never migrates it."""
