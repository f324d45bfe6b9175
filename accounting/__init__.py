"""The books of the federation: identities (labs, users) now; prices, ledger and fair share later.

accounting/ never imports federation/; the broker calls into it.
"""
