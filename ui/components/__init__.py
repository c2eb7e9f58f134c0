"""Pieces the dashboard's pages share, one module per kind of thing they hold.

client      the page's Client (`get_client`) and `guard`, which turns failures into readable errors
signin      the password / OIDC gate ui/app.py runs before any page
formatting  numbers, byte sizes and durations as the pages print them
tokens      token text with visible whitespace, activation shading, top-token strings
charts      small line charts, and a job's progress history charted
jobs        the live progress panel, job cards with their controls, submitting a job, the jobs table
forms       pickers and defaults several forms share (model + dataset, the run form's defaults,
            the labeling endpoint's session key)

Pages import these modules and `actors.client` only. Nothing here reaches past the Client either;
forms reads the demo's run from ui/cli_demo.py, the other front end, so the two keep one set of values.
"""
