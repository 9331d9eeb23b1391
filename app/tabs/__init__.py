"""One module per tab of the page, each with ``build(page: PageContext)``: the tab's components,
its handlers and their events. A new tab is a module here and one entry in :data:`pmpo.app.ui.TABS`."""
