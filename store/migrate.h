#ifndef BW_STORE_MIGRATE_H
#define BW_STORE_MIGRATE_H

/*
 * The schema migrations compiled into the binary.  The table is generated at
 * build time by scripts/embed-sql.sh from sql/NNN_*.sql (build/migrations.c),
 * one entry per file, in ascending version order: version is the file name's
 * leading number, name the file name, sql its whole text.
 */
struct bw_migration {
	int version;
	const char *name;
	const char *sql;
};

extern const struct bw_migration bw_migrations[];
extern const int bw_migrations_count;

#endif /* BW_STORE_MIGRATE_H */
