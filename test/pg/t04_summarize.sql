-- Summarize a real long page of the PostgreSQL manual (kl_docs, loaded from
-- test/fixtures/corpus/pgdocs.json by test/run-tests.sh), and the aggregate.
BEGIN;
SELECT plan(7);

SELECT page AS long_page, array_length(kimi_linear.tokenize(text), 1) AS long_tokens
FROM kl_docs ORDER BY length(text) DESC LIMIT 1 \gset
SELECT cmp_ok(:long_tokens, '>', 40000, format('the longest page (%s) has %s tokens', :'long_page', :long_tokens));

SELECT ok(length(kimi_linear.summarize(text, max_tokens => 48)) > 0, 'summarize reads the whole longest page')
FROM kl_docs WHERE page = :'long_page';

-- No single page of the manual reaches 50k tokens (the longest has about 40k):
-- the two longest pages together make the over-50k-token document.
CREATE TEMP TABLE kl_long AS
SELECT string_agg(text, E'\n\n' ORDER BY length(text) DESC) AS text
FROM (SELECT text FROM kl_docs ORDER BY length(text) DESC LIMIT 2) p;
SELECT array_length(kimi_linear.tokenize(text), 1) AS longer_tokens FROM kl_long \gset
SELECT cmp_ok(:longer_tokens, '>', 50000, format('the two longest pages together have %s tokens', :longer_tokens));
SELECT ok(length(kimi_linear.summarize(text, max_tokens => 32)) > 0, 'summarize a document of over 50k tokens')
FROM kl_long;

SELECT ok(length(kimi_linear.summarize_agg(text ORDER BY page)) > 0, 'summarize_agg over a group of pages')
FROM kl_docs WHERE page IN ('sql-vacuum.html', 'sql-analyze.html', 'routine-vacuuming.html');

SELECT is((SELECT count(*)::int FROM (SELECT kimi_linear.summarize_agg(text, 8) AS s FROM kl_docs
             WHERE page LIKE 'sql-alter%' AND length(text) < 3000 GROUP BY left(page, 11)) g WHERE length(s) > 0),
          (SELECT count(DISTINCT left(page, 11))::int FROM kl_docs WHERE page LIKE 'sql-alter%' AND length(text) < 3000),
          'summarize_agg: one summary per group');
SELECT is((SELECT count(*)::int FROM kimi_linear.activity), 0, 'nothing left in flight');

SELECT * FROM finish();
ROLLBACK;
