/* AMX tiles: the configuration record and the permission Linux asks for before a process may use them. */

#ifndef TUNELAB_AMX_H
#define TUNELAB_AMX_H

#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct { /* _tile_loadconfig's 64 bytes: each tile's rows and bytes per row */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} tile_config;

static int amx_permitted(void) { /* Linux hands out AMX state on request, once per process */
    static int state = 0;
    if (state == 0) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state == 1;
}

#endif
