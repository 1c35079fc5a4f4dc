"""View modules the pages draw with: plain modules, not pages (st.navigation lists only pages/*.py)."""
