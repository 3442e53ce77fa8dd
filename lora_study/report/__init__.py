"""What a report question is and how the page asks every registered one (question), the chart style every
chart shares (style), the page itself (page), and experiment tracking (tracking)."""
