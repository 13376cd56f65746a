"""`spendstream ui`: a read-only web dashboard of spend, budgets and the live kill switch
(`app`: the aiohttp app; `data`: the SQL; `pages`: the HTML; `svg`: the charts; `live`: spend.control)."""
